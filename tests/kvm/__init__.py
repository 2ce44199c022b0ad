"""KVM guests: run where /dev/kvm is usable; CI fails if it exists and these skipped."""
