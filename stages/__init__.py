"""One file per stage; each defines a Config and a Stage subclass found by the registry."""
