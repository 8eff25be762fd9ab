#!/usr/bin/env bash
# Bootstrap a fresh Ubuntu GPU machine (Lambda or similar) for training: install
# uv and the xkcd chart font when missing, sync the project's environment,
# optionally pre-download datasets, and print the torchrun command for this
# machine's GPUs. Safe to run again: steps already done are skipped.
set -euo pipefail

readonly UV_INSTALLER_URL="https://astral.sh/uv/install.sh"
readonly XKCD_FONT_URL="https://raw.githubusercontent.com/ipython/xkcd-font/master/xkcd-script/font/xkcd-script.ttf"
# Where fontconfig and matplotlib look for a user's fonts, and where matplotlib caches its font list.
readonly FONT_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/fonts"
readonly XKCD_FONT_FILE="$FONT_DIR/xkcd-script.ttf"
readonly MATPLOTLIB_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/matplotlib"
readonly DATASETS_DIR="datasets"
# Set when this run installs uv: the calling shell will not find it until it reloads PATH.
uv_installed_now=false

usage() {
    cat <<EOF
Usage: ./setup_lambda.sh [--with-datasets NAME]...

Prepare this machine for training: install uv (if missing) and the xkcd font
for the charts, run 'uv sync', and print the torchrun command for its GPUs.

Options:
  --with-datasets NAME  also download the Hugging Face dataset NAME (e.g.
                        gpjt/fineweb-gpt2-tokens) into $DATASETS_DIR/NAME;
                        may be given more than once
  -h, --help            show this help and exit
EOF
}

log() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

install_uv() {
    if command -v uv >/dev/null; then
        log "uv already installed: $(uv --version)"
        return
    fi
    log "installing uv"
    curl -LsSf "$UV_INSTALLER_URL" | sh
    # The installer puts uv in ~/.local/bin, which this shell may not have on PATH yet.
    export PATH="$HOME/.local/bin:$PATH"
    command -v uv >/dev/null || die "uv was installed but is not on PATH (look in ~/.local/bin)"
    uv_installed_now=true
}

install_xkcd_font() {
    if [[ -f "$XKCD_FONT_FILE" ]]; then
        log "xkcd font already installed"
        return
    fi
    log "installing the xkcd font for the charts"
    mkdir -p "$FONT_DIR"
    # Download beside the target and rename, so an interrupted download is retried next time.
    # Charts fall back to the plain style without the font, so a failure is not fatal.
    if ! curl -fsSL -o "$XKCD_FONT_FILE.partial" "$XKCD_FONT_URL"; then
        rm -f "$XKCD_FONT_FILE.partial"
        warn "could not download the xkcd font; charts will use the plain style"
        return
    fi
    mv "$XKCD_FONT_FILE.partial" "$XKCD_FONT_FILE"
    # matplotlib scans the font directory itself; fontconfig is only for other programs.
    if command -v fc-cache >/dev/null; then
        fc-cache -f "$FONT_DIR"
    fi
    # matplotlib never rescans once it has cached its font list: drop the cache.
    rm -f "$MATPLOTLIB_CACHE_DIR"/fontlist-*.json
}

download_dataset() {
    local name=$1
    log "downloading dataset $name into $DATASETS_DIR/$name"
    # snapshot_download skips files already downloaded, so re-running is cheap.
    uv run python -c 'import sys
from huggingface_hub import snapshot_download
snapshot_download(repo_id=sys.argv[1], repo_type="dataset", local_dir=sys.argv[2])' \
        "$name" "$DATASETS_DIR/$name"
}

count_gpus() {
    if command -v nvidia-smi >/dev/null; then
        # grep -c prints 0 but fails when nothing matches.
        nvidia-smi -L | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

show_training_command() {
    local gpus
    gpus=$(count_gpus)
    if ((gpus == 0)); then
        warn "no NVIDIA GPU found (nvidia-smi missing or lists none); one CPU process is only good for a smoke test"
        gpus=1
    else
        log "$gpus GPUs:"
        nvidia-smi -L
    fi
    log "ready. Put model.json and train.json in runs/<run>/, then train with:"
    printf '    uv run torchrun --nproc_per_node=%d ddp_train.py <run> %s\n' "$gpus" "$DATASETS_DIR"
    if [[ $uv_installed_now == true ]]; then
        log "uv was just installed: first run 'source ~/.local/bin/env' (or log in again) so your shell finds it"
    fi
}

main() {
    local datasets=()
    while (($# > 0)); do
        case $1 in
            --with-datasets)
                (($# >= 2)) || die "--with-datasets needs a dataset name, e.g. gpjt/fineweb-gpt2-tokens"
                datasets+=("$2")
                shift 2
                ;;
            -h | --help)
                usage
                exit 0
                ;;
            *) die "unknown argument '$1' (see --help)" ;;
        esac
    done

    # Everything below works on the project this script belongs to, wherever it is run from.
    cd "$(dirname "${BASH_SOURCE[0]}")"
    install_uv
    install_xkcd_font
    log "syncing the Python environment"
    uv sync
    local name
    for name in "${datasets[@]}"; do
        download_dataset "$name"
    done
    show_training_command
}

main "$@"
