"""ksmtrace: an eBPF-assisted tracer and targeted merger for Linux KSM."""

__version__ = "0.1.0"
