"""The vbus ABI (AlacrityVM): shm-signal, IOQ, the bus bridge, venet and vblock."""
