// Bundles page.js with the real Zero client for the browser: `node build.mjs OUTDIR` writes
// OUTDIR/index.html and OUTDIR/page.js. tests/browser.rs runs it before it opens the page.
//
// @rocicorp/zero comes from ../zero/node_modules, the copy (1.9.0, pinned by its lock file)
// that tests/zero_client.rs drives on Node, so both tests run the same client; esbuild comes
// from ./node_modules (this folder's package-lock.json). scripts/test.sh installs both.

import {copyFileSync, mkdirSync} from 'node:fs';
import {dirname, join} from 'node:path';
import {fileURLToPath} from 'node:url';
import {build} from 'esbuild';

const here = dirname(fileURLToPath(import.meta.url));
const out = process.argv[2];
if (!out) {
  process.stderr.write('usage: node build.mjs OUTDIR\n');
  process.exit(2);
}
mkdirSync(out, {recursive: true});
await build({
  entryPoints: [join(here, 'page.js')],
  outfile: join(out, 'page.js'),
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2022',
  nodePaths: [join(here, '../zero/node_modules')],
  define: {'process.env.NODE_ENV': '"production"'},
  sourcemap: 'inline',
  logLevel: 'warning',
});
copyFileSync(join(here, 'index.html'), join(out, 'index.html'));
