"""Pure decisions, no I/O: what a call costs, which period it falls in, which cap trips,
whether an object is valid, and which gateway configuration the objects produce."""
