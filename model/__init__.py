"""Model cards and the recipes that make models from registry packages; never part of the service package or image."""
