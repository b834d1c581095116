"""Lightning workflows (SFT for now) and the Lightning CLI that runs them from recipes."""
