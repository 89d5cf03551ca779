#!/usr/bin/env bash
# One node's software, run by `ray up` on every node (head_setup_commands / worker_setup_commands) once this
# checkout is synced to ~/ray-resnet. Usage: setup_node.sh [--gpu]   (--gpu: the node must have an NVIDIA GPU)
#
# 1. The NVIDIA driver, wherever nvidia-smi exists: the torch wheels below are built for CUDA 13.0, whose kernels
#    need driver >= 580 (an older driver fails the first CUDA call) and compute capability >= 7.5 (no V100).
# 2. torch, torchvision and Ray into a venv, only when the venv lacks these exact versions: a node booted from an
#    image that already has them (a custom image made from a set-up node, cluster/README.md), or restarted, skips
#    the ~4 GB download. They are the versions the tests ran with; the head, every worker and the machine that
#    submits jobs must run the same Ray.
# 3. This checkout, pip-installed into that venv (editable: quick when nothing changed), and the venv on PATH.
set -euo pipefail

TORCH=2.14.1+cu130
TORCHVISION=0.29.1+cu130
RAY=2.60.0
TORCH_INDEX=https://download.pytorch.org/whl/cu130
MIN_DRIVER=580             # CUDA 13.0's minimum Linux driver (NVIDIA's CUDA toolkit release notes)
VENV=${RAY_RESNET_VENV:-$HOME/ray-resnet-venv}
REPO=${RAY_RESNET_REPO:-$HOME/ray-resnet}

check_driver() {
    if ! command -v nvidia-smi >/dev/null; then
        if [[ ${1:-} == --gpu ]]; then
            echo "setup_node: no nvidia-smi on this GPU node: the image has no NVIDIA driver (cluster/README.md)" >&2
            exit 1
        fi
        return 0
    fi
    local driver
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1) || true
    if [[ ! $driver =~ ^[0-9]+\. ]]; then
        echo "setup_node: nvidia-smi cannot reach an NVIDIA driver (${driver:-no output}): the image's driver is" \
             "not loaded or does not match its kernel; use an image with driver >= $MIN_DRIVER (cluster/README.md)" >&2
        exit 1
    fi
    if (( ${driver%%.*} < MIN_DRIVER )); then
        echo "setup_node: NVIDIA driver $driver is older than $MIN_DRIVER, which torch $TORCH needs:" \
             "use an image with driver >= $MIN_DRIVER (cluster/README.md)" >&2
        exit 1
    fi
    echo "setup_node: NVIDIA driver $driver (>= $MIN_DRIVER)"
}

install_stack() {
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV" || {
        sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv "$VENV"; }
    local want="$TORCH $TORCHVISION $RAY" have
    have=$("$VENV/bin/python" -c "import torch, torchvision as tv, ray
print(torch.__version__, tv.__version__, ray.__version__)" 2>/dev/null || true)
    if [[ $have == "$want" ]]; then
        echo "setup_node: torch, torchvision, ray already installed ($have)"
        return 0
    fi
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$TORCHVISION" --index-url "$TORCH_INDEX"
    "$VENV/bin/pip" install -q "ray[default,train,tune]==$RAY"
}

install_checkout() {
    if ! "$VENV/bin/python" -c "import ray_resnet, sys; sys.exit(not ray_resnet.__file__.startswith('$REPO/'))" \
            2>/dev/null; then
        "$VENV/bin/pip" install -q -e "$REPO"
    fi
    grep -qs "$VENV/bin" "$HOME/.bashrc" || echo "export PATH=$VENV/bin:\$PATH" >> "$HOME/.bashrc"
}

check_driver "${1:-}"
install_stack
install_checkout
