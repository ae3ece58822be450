"""Host interfaces, one module per WIT interface, linked only when granted."""
