"""Device profiles (YAML), detection of the board and its power mode, and power-mode watching."""
