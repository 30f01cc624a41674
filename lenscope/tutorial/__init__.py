"""The Patchscopes tutorial as a web app (``lenscope tutorial``): ``sections`` computes, ``app`` shows."""
