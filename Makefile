# Convenience targets; CI runs .ci/run (the README's commands).
.PHONY: test vm-test vm-box

test:
	./scripts/install.sh && .venv/bin/python -m pytest

# The suite inside a Debian 12 VM (Linux 6.1), offline: vagrant/run-vm-tests.sh.
vm-test:
	./vagrant/run-vm-tests.sh

vm-box:
	./vagrant/build-box.sh
