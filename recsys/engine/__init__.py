"""The request path, one module per stage; ``engine.Engine`` composes them."""
