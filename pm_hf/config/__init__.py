"""The configuration: `PMConfig` and the argument groups, presets, and the checks of user input."""
