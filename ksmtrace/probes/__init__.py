"""Load bpf/*.c with BCC, attach, and decode maps and events into typed records."""
