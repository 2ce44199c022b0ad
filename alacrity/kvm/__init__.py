"""KVM guests: a Python VMM on /dev/kvm (`vm.py`) running freestanding C drivers (`payload/`)."""
