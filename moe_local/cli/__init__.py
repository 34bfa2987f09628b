"""The Typer + Rich command line: parses, calls library code, renders (every table, progress bar and
plot lives here). Checks of user input live with the objects they check, not here."""
