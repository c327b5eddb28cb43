// Debian's Chromium as these tests start it: headless, no sandbox (root),
// and none of the background traffic this machine's closed network refuses.
import { chromium } from 'playwright-core';

export const EXECUTABLE = process.env.CHROMIUM || '/usr/bin/chromium';

export const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

export function launch() {
  return chromium.launch({ executablePath: EXECUTABLE, args: CHROMIUM_ARGS });
}
