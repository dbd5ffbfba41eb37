#!/usr/bin/env bash
# Prepares .carry/ (git-ignored) with what the GPU benchmarks need on a machine with no network:
# comfy-kitchen for Python 3.12 without its HIP library (it does not fit the 64 MiB carry otherwise),
# the pure-Python packages ComfyUI 0.19.3 imports that the GPU image lacks, SageAttention 1.0.6, and
# the ComfyUI 0.19.3 source tarball. Then, on the GPU machine (run with carry [".carry"]):
#   python -m pip install -q --no-deps .carry/comfy_kitchen-*.whl .carry/wheels/*.whl
#   mkdir -p /tmp/comfy && tar -xJf .carry/comfyui-0.19.3.tar.xz -C /tmp/comfy
#   PYTHONPATH=$PWD python -m bench.e2e --comfy /tmp/comfy [--models ...] [--fp8 --fast fp8_matrix_mult]
#   PYTHONPATH=$PWD python -m bench.frontier
set -euo pipefail
cd "$(dirname "$0")/.."
VENDOR=${VENDOR:-../shared/vendor}
mkdir -p .carry/wheels
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q comfy-kitchen==0.2.40 --no-deps --python-version 3.12 --only-binary=:all: -d "$tmp/ck"
python3 - "$tmp/ck" .carry <<'EOF'
import glob, os, sys, zipfile
src = glob.glob(os.path.join(sys.argv[1], "comfy_kitchen-*.whl"))[0]
dst = os.path.join(sys.argv[2], os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if "/backends/hip/" in item.filename:
            continue
        data = zin.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.splitlines() if b"/backends/hip/" not in l) + b"\n"
        zout.writestr(item, data)
print(dst, os.path.getsize(dst) >> 20, "MiB")
EOF
python3 -m pip download -q torchsde trampoline comfy-aimdo truststore httpx2 httpcore2 sageattention==1.0.6 \
  --no-deps --python-version 3.12 --only-binary=:all: -d .carry/wheels
cp "$VENDOR/comfyui-0.19.3.tar.xz" .carry/
du -sh .carry
