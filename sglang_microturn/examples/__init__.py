"""Examples the CLI runs (`sglang-microturn demo` runs duplex_chat); shipped inside the package."""
