"""Deciding and acting: which runs are worth merging (worth), the actuator (the only writer of
machine-wide KSM state) and its journal."""
