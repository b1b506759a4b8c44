"""elbokit's built-in components, each module a plugin loaded like any third-party one."""
