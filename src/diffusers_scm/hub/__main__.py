"""`python -m diffusers_scm.hub FOLDER [--push_to_hub] ...`: see `diffusers_scm.hub.push.main`."""

from .push import main


if __name__ == "__main__":
    main()
