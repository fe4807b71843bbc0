"""Update compression: the codec (both sides) and a site's error feedback."""
