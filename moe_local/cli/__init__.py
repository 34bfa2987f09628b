"""The Typer + Rich command line. Parses, calls library code, renders. No logic of its own."""
