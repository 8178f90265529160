"""Deciding and acting: the actuator (the only writer of machine-wide KSM state) and its journal."""
