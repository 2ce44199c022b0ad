"""Guest-side drivers, in Python, for both ABIs. They trust nothing the device writes."""
