"""Sources: where archives come from (local Mix projects here; Hex, GitHub, books later)."""
