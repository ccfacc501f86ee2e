"""Tests against real peers from Debian's packages (Postfix)."""
