"""vhost-user: protocol codec, backend (our devices served to others), frontend (our drivers on others' backends)."""
