"""What every trainer shares, apart from its model, data and loss (the one engine; it grows piece by
piece)."""
