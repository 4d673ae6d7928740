"""What tests share: real servers and processes, files written as a robot writes them,
bounded waits. Test modules import from here, never from each other (tests/test_layers.py);
`bench` imports from here too, so a helper has one definition."""
