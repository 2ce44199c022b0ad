"""Transport-free device cores and their backends. No ring code here."""
