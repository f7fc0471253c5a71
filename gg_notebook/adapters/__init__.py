"""Ways into a `Problem` other than two hand-written functions: graphs captured elsewhere
(`graphs`), and, per framework, models built by their library. Each adapter ends in a plain
`gg_notebook.Problem`; nothing here is imported unless used.
"""
