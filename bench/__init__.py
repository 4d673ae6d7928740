"""`make bench` / `python -m bench [NAME ...] [--quick]`: one module per benchmark."""
