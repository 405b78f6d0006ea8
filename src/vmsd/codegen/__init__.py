"""The compiler: resolved model, Jinja templates, and the files it writes."""
