#!/usr/bin/env bash
# Sets up what the ComfyUI integration and frontend tests need, in git-ignored folders of this clone,
# and writes .ci-comfy.env with the variables the tests read. .ci/run runs it before pytest; by hand:
#   bash .ci/setup_comfyui.sh && . ./.ci-comfy.env && python -m pytest -q
#
#   .comfyui-0.3.64/ .comfyui-0.19.3/  ComfyUI source trees, from ../shared/vendor (or $VORTA_VENDOR)
#   .comfyui-gguf/                     city96/ComfyUI-GGUF, from the same folder
#   .venv-comfy/                       torch 2.14.1 + torchvision 0.29.1 (the CPU-usable pair on this
#                                      machine's disk) + the newest tree's requirements + requests, gguf
#   .venv-comfy-<tree>/                for each older tree: a venv that sees .venv-comfy's packages and
#                                      adds the exact pins of that tree that differ (frontend, workflow
#                                      templates, docs): 0.3.64 does not start with 0.19.3's templates package
#   .frontends/<version>/              comfyui-frontend-package: each tree's pin and PyPI's newest
#   .ci-node/                          playwright-core (npm); Chromium is Debian's (apt-get)
#
# Idempotent: what is already in place is kept, so a re-run takes seconds. Needs Python 3.11, Node.js,
# npm, and root (or sudo) for apt-get when /usr/bin/chromium is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENDOR=${VORTA_VENDOR:-$ROOT/../shared/vendor}
TREES=(0.3.64 0.19.3)                # oldest first; the last one is the newest and makes .venv-comfy
NEWEST_TREE=${TREES[${#TREES[@]}-1]}
GGUF_TARBALL=comfyui-gguf-795e451.tar.xz
TORCH=(torch==2.14.1 torchvision==0.29.1)
PLAYWRIGHT_CORE=1.65.1
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
PY=${PYTHON:-python3}

say() { echo "[setup_comfyui $(date -u +%H:%M:%S)] $*"; }
die() { echo "[setup_comfyui] ERROR: $*" >&2; exit 1; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
# pip, less its notes about this machine's local package folders (one per package looked up)
pip_() { { "$@" 2>&1; } | { grep -v "^WARNING: Location 'file://" || true; }; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "needs root for: $*"; fi; }

# --- 1. source trees -------------------------------------------------------------------------------
unpack() {  # tarball dest: unpacked into dest.tmp, then moved, so a half-unpacked folder is never kept
  local tarball=$VENDOR/$1 dest=$2
  [ -f "$tarball" ] || die "$tarball not found (set VORTA_VENDOR to the folder with the vendored tarballs)"
  local stamp; stamp="$1 $(stat -c %s "$tarball")"
  if stamp_ok "$dest/.vorta-unpacked" "$stamp"; then return; fi
  say "unpacking $1 into $dest"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  tar -xJf "$tarball" -C "$dest.tmp"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  echo "$stamp" > "$dest/.vorta-unpacked"
}
for t in "${TREES[@]}"; do unpack "comfyui-$t.tar.xz" ".comfyui-$t"; done
unpack "$GGUF_TARBALL" .comfyui-gguf
for t in "${TREES[@]}"; do
  v=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' ".comfyui-$t/comfyui_version.py")
  [ "$v" = "$t" ] || die ".comfyui-$t/comfyui_version.py says $v"
  grep -q '"--front-end-root"' ".comfyui-$t/comfy/cli_args.py" || die "ComfyUI $t has no --front-end-root"
done

# --- 2. venvs --------------------------------------------------------------------------------------
REQ=$(grep -vxE 'torch|torchvision' ".comfyui-$NEWEST_TREE/requirements.txt"; echo requests; echo gguf)
STAMP="${TORCH[*]} | $REQ"
if ! stamp_ok .venv-comfy/.vorta-stamp "$STAMP"; then
  say "making .venv-comfy: ${TORCH[*]} + ComfyUI $NEWEST_TREE's requirements.txt + requests gguf"
  rm -rf .venv-comfy
  "$PY" -m venv .venv-comfy
  pip_ .venv-comfy/bin/pip install -q "${TORCH[@]}"
  printf '%s\n' "$REQ" > .venv-comfy/vorta-requirements.txt
  pip_ .venv-comfy/bin/pip install -q -r .venv-comfy/vorta-requirements.txt
  echo "$STAMP" > .venv-comfy/.vorta-stamp
fi
BASE_SITE=$(.venv-comfy/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for t in "${TREES[@]}"; do
  [ "$t" = "$NEWEST_TREE" ] && continue
  # this tree's exact pins that the newest tree pins otherwise (or not at all)
  PINS=$(grep -E '^[A-Za-z0-9_.-]+==' ".comfyui-$t/requirements.txt" | grep -vxF -f ".comfyui-$NEWEST_TREE/requirements.txt" || true)
  V=.venv-comfy-$t
  STAMP_T="$STAMP | $BASE_SITE | $PINS"
  if ! stamp_ok "$V/.vorta-stamp" "$STAMP_T"; then
    say "making $V: .venv-comfy's packages + $(echo $PINS)"
    rm -rf "$V"
    "$PY" -m venv "$V"
    SITE=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # after this venv's own site-packages: its own pins win, everything else comes from .venv-comfy
    echo "import site; site.addsitedir('$BASE_SITE')" > "$SITE/zz_vorta_base.pth"
    if [ -n "$PINS" ]; then
      # --ignore-installed: never touch .venv-comfy's copies, which pip sees through the .pth
      pip_ "$V/bin/pip" install -q --no-deps --ignore-installed $PINS
    fi
    echo "$STAMP_T" > "$V/.vorta-stamp"
  fi
done
comfy_py() { if [ "$1" = "$NEWEST_TREE" ]; then echo "$ROOT/.venv-comfy/bin/python"; else echo "$ROOT/.venv-comfy-$1/bin/python"; fi; }

# Does each tree start with its Python? (--quick-test-for-ci: loads every node, then exits)
for t in "${TREES[@]}"; do
  base=$(mktemp -d)
  mkdir -p "$base/custom_nodes" "$base/user"
  if ! (cd ".comfyui-$t" && timeout 300 "$(comfy_py "$t")" main.py --cpu --disable-auto-launch --quick-test-for-ci \
        --base-directory "$base" > "$base/log" 2>&1); then
    tail -30 "$base/log" >&2
    die "ComfyUI $t does not start with $(comfy_py "$t")"
  fi
  say "ComfyUI $t starts with $(comfy_py "$t") ($(sed -n 's/^ComfyUI frontend version: //p' "$base/log") frontend installed)"
  rm -rf "$base"
done

# --- 3. frontends, Chromium, playwright-core -------------------------------------------------------
NEWEST_FE=${VORTA_FRONTEND_NEWEST:-$(.venv-comfy/bin/pip index versions comfyui-frontend-package 2>/dev/null \
  | sed -n 's/^comfyui-frontend-package (\(.*\))$/\1/p' || true)}
[ -n "$NEWEST_FE" ] || die "could not learn the newest comfyui-frontend-package from PyPI (pip index versions)"
fe_static() { echo "$ROOT/.frontends/$1/comfyui_frontend_package/static"; }
install_fe() {
  local v=$1
  [ -f "$(fe_static "$v")/index.html" ] && [ -d ".frontends/$v/comfyui_frontend_package-$v.dist-info" ] && return
  say "installing comfyui-frontend-package==$v into .frontends/$v"
  rm -rf ".frontends/$v.tmp" ".frontends/$v"
  pip_ .venv-comfy/bin/pip install -q --no-deps --target ".frontends/$v.tmp" "comfyui-frontend-package==$v"
  mv ".frontends/$v.tmp" ".frontends/$v"
}
FRONTENDS=()
for t in "${TREES[@]}"; do
  v=$(sed -n 's/^comfyui-frontend-package==//p' ".comfyui-$t/requirements.txt")
  [ -n "$v" ] || die "ComfyUI $t pins no comfyui-frontend-package"
  install_fe "$v"
  FRONTENDS+=("$t=$(fe_static "$v")")
done
install_fe "$NEWEST_FE"
case " ${FRONTENDS[*]} " in
  *" $NEWEST_TREE=$(fe_static "$NEWEST_FE") "*) ;;  # the newest tree already pins PyPI's newest
  *) FRONTENDS+=("$NEWEST_TREE=$(fe_static "$NEWEST_FE")") ;;
esac

if [ ! -x "$CHROMIUM" ]; then
  say "installing Debian's chromium"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
fi
[ -x "$CHROMIUM" ] || die "no Chromium at $CHROMIUM"
if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  say "installing Debian's nodejs and npm"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm > /dev/null
fi
if [ "$(node -p 'require("./.ci-node/node_modules/playwright-core/package.json").version' 2>/dev/null)" != "$PLAYWRIGHT_CORE" ]; then
  say "installing playwright-core@$PLAYWRIGHT_CORE into .ci-node"
  mkdir -p .ci-node
  npm install --prefix .ci-node --no-audit --no-fund --silent "playwright-core@$PLAYWRIGHT_CORE"
fi

# --- the variables the tests read ------------------------------------------------------------------
PATHS=""
for t in "${TREES[@]}"; do PATHS="${PATHS:+$PATHS:}$ROOT/.comfyui-$t"; done
{
  echo "# written by .ci/setup_comfyui.sh"
  echo "export COMFYUI_PATHS='$PATHS'"
  echo "export COMFYUI_PYTHON='$ROOT/.venv-comfy/bin/python'"
  for t in "${TREES[@]}"; do
    [ "$t" = "$NEWEST_TREE" ] || echo "export COMFYUI_PYTHON_${t//./_}='$(comfy_py "$t")'"
  done
  echo "export COMFYUI_GGUF_PATH='$ROOT/.comfyui-gguf'"
  echo "export VORTA_FRONTENDS='$(IFS=';'; echo "${FRONTENDS[*]}")'"
  echo "export PLAYWRIGHT_CORE_DIR='$ROOT/.ci-node'"
  echo "export CHROMIUM='$CHROMIUM'"
} > .ci-comfy.env
say "trees ${TREES[*]}; frontends: ${FRONTENDS[*]//$ROOT\//}; playwright-core $PLAYWRIGHT_CORE, $("$CHROMIUM" --version 2>/dev/null)"
say "wrote .ci-comfy.env"
