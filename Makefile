# vmrun: the two Quickstart commands are `make run` and `make test`.
# Everything they need is installed or built here, with progress shown; the guest image is
# cached outside the repository (~/.cache/vmrun).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEB_PACKAGES := linux-source-6.1 busybox-static acpica-tools dmidecode e2fsprogs flex bison bc \
                libelf-dev libssl-dev gcc libc6-dev make xz-utils qemu-utils xorriso socat \
                passt tcpdump iproute2 cloud-init genisoimage openssh-client \
                tigervnc-viewer xvfb
# The peers the benchmarks measure against (bench/blk.py runs QEMU side by side), and the
# host load bench/guest_integrity.py --load puts beside the guest.
BENCH_PACKAGES := qemu-system-x86 qemu-utils stress-ng
MACHINE ?= machines/tiny.toml

.PHONY: run test test-pending test-slow deps deps-slow venv image lint bench fuzz clean

run: venv image
	$(BIN)/vmrun up $(MACHINE)

# The end-to-end boots in the foreground, the unit and KVM tests beside them (tests/run.sh).
test: venv image
	PY=$(BIN)/python tests/run.sh $(PYTEST_ARGS)

# End-to-end checks written but not yet seen passing on this project's host (see the notes).
test-pending: venv image
	$(BIN)/python -m pytest -ra -m e2e_pending $(PYTEST_ARGS)

# A real distribution kernel (Debian's linux-image-amd64, fetched through apt) and an
# initramfs-tools initrd boot to a root found by label: tens of minutes on an emulating host.
test-slow: venv image deps-slow
	$(BIN)/python -m pytest -ra -s -m slow tests/e2e/test_distro_kernel.py $(PYTEST_ARGS)

deps-slow:
	@dpkg-query -W -f='$${Status}' initramfs-tools 2>/dev/null | grep -q "install ok installed" || { \
	  echo "==> installing Debian packages: initramfs-tools"; \
	  if [ "$$(id -u)" = 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q initramfs-tools; \
	  else sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q initramfs-tools; fi; }

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi; \
	fi

$(BIN)/vmrun: pyproject.toml $(wildcard plugins/*/pyproject.toml) | deps
	@echo "==> creating $(VENV) and installing vmrun and its plugins"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --progress-bar on -e '.[test]' $(foreach p,$(wildcard plugins/*/pyproject.toml),-e $(dir $(p)))
	@touch $@

venv: deps $(BIN)/vmrun

image: venv
	$(BIN)/vmrun image build tiny

lint: venv
	$(BIN)/ruff check vmrun tests plugins bench

# The hostile virtio driver with many more examples and longer sequences (minutes).
fuzz: venv
	VMRUN_FUZZ=1 $(BIN)/python -m pytest -q tests/test_hostile_virtio.py

bench: venv image
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache
