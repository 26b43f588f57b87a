"""GLoRIA (paper §3.2, Fig. 6): the image-text model, its training and the word attention maps that place
the SR window."""
