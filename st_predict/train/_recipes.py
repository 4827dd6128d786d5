"""Where models saved in format 1 pickled their recipe (``st_predict.train._recipes.Recipe``): kept so
that those files load. The recipes live in :mod:`st_predict._settings`; :class:`Recipe` migrates the
old pickled layout when it is unpickled."""

from st_predict._settings import Recipe

__all__ = ["Recipe"]
