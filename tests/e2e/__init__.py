"""End-to-end tests: the relay as a whole, over loopback, with real servers and peers."""
