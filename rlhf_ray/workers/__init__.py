"""One module per Ray role: a plain class plus a thin ``ray.remote`` shell."""
