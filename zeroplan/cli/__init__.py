"""zeroplan's command line: one module per verb (parse, call the library, print)."""
