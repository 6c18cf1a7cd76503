"""Publishing a recipe's results to the Hugging Face Hub: the folder and model card (card.py, folder.py) and the
upload (upload.py). The publish stage (pipeline/stages/publish.py) strings them together."""
