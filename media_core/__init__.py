"""The media and protocol core: SIP codec, RTP/RTCP, G.711, jitter buffer, DTMF, tones, mixer,
recorder, voice quality and the GIL-free media engine. Knows nothing of queues, agents or the
cloud."""
