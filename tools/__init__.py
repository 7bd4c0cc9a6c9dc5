"""Development tools (lint contracts); not part of the installed package."""
