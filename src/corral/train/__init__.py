"""Training: the stage table, shared trainer machinery, and one short module per stage."""
