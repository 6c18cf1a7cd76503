"""llama.cpp's own programs for the export stage: `llama-completion` runs every GGUF written, `llama-quantize` makes
the K-quants. `install` builds them from a pinned source into a cache outside the clone; `completion` runs one GGUF;
`verify` compares its greedy text with transformers on the merged model."""
