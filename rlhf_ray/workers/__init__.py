"""One module per role, each a plain class that imports neither Ray nor an inference engine at
module level (so the logic can be driven in-process, e.g. on a GPU machine without Ray);
``actors.py`` holds their thin ``ray.remote`` shells, the only place here that imports Ray."""
