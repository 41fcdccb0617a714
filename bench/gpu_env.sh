# Sourced by the GPU scripts: wheels carried in .whl/ (the GPU machine reaches no network), the
# package from src/, and DATA, the CIFAR-10 JPEG copy.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
DATA="${DATA:-shared/data/cifar10-jpeg.tar.xz}"
