"""Networks whose attribute names equal the original checkpoint keys."""
