/*
 * NBD names: URIs (QEMU 7.2's nbd_parse_uri plus the nbds schemes), the
 * legacy `nbd:` pseudo-filenames, and the name a node shows
 * (nbd_refresh_filename), and the nbd driver's options with QEMU's
 * messages. The interop tests compare the messages with qemu-img's; these
 * pin them where qemu-img is not installed.
 */
import { describe, expect, it } from 'vitest';
import { parseWith } from '../../block/options.js';
import { nbdConfig, nbdOptionsSchema } from '../../drivers/nbd-options.js';
import { NO_VALID_URL, describeAddress, nbdExactFilename, parseNbdFilename } from '../../nbd/uri.js';

describe('NBD URIs', () => {
  it.each([
    ['nbd://example.com/exp', { address: { type: 'inet', host: 'example.com', port: '10809' }, exportName: 'exp' }],
    ['nbd://127.0.0.1:1234', { address: { type: 'inet', host: '127.0.0.1', port: '1234' } }],
    ['nbd+tcp://h:0/a/b', { address: { type: 'inet', host: 'h', port: '10809' }, exportName: 'a/b' }],
    ['nbd://[::1]:99//x', { address: { type: 'inet', host: '::1', port: '99' }, exportName: '/x' }],
    ['nbd+unix:///e%78p?socket=/tmp/s', { address: { type: 'unix', path: '/tmp/s' }, exportName: 'exp' }],
    ['nbd+unix://?socket=/tmp/s', { address: { type: 'unix', path: '/tmp/s' } }],
    ['nbds://alice@h/e?tls-certificates=/c', { address: { type: 'inet', host: 'h', port: '10809' }, exportName: 'e', tls: { certificatesDir: '/c', username: 'alice' } }],
    ['nbds+unix://bob@/?socket=/s&tls-psk-file=/k', { address: { type: 'unix', path: '/s' }, tls: { pskFile: '/k', username: 'bob' } }],
    ['nbd:unix:/tmp/s:exportname=e', { address: { type: 'unix', path: '/tmp/s' }, exportName: 'e' }],
    ['nbd:localhost:10809', { address: { type: 'inet', host: 'localhost', port: '10809' } }],
    ['nbd:[::1]:5:exportname=x', { address: { type: 'inet', host: '::1', port: '5' }, exportName: 'x' }],
    ['nbd:unix:/s:exportname=', { address: null }],
    ['nbd:', { address: null }],
  ])('%s', (name, expected) => {
    expect(parseNbdFilename(name)).toEqual(expected);
  });

  it.each([
    'nbd+unix:///exp',
    'nbd+unix://host/exp?socket=/s',
    'nbd+unix://:5/?socket=/s',
    'nbd+unix:///?socket=/s&socket=/t',
    'nbd://',
    'nbd:///exp',
    'nbd://h/exp?socket=/s',
    'nbd://h/exp?tls-certificates=/c',
    'nbd://h:99999/',
    'nbd+rdma://h/',
    'nbd://h/%zz',
  ])('refuses %s', (name) => {
    expect(parseNbdFilename(name)).toBe(NO_VALID_URL);
  });

  it('refuses legacy names as QEMU does', () => {
    expect(parseNbdFilename('nbd:127.0.0.1')).toBe("error parsing address '127.0.0.1'");
    expect(parseNbdFilename('file:x:exportname=y')).toBe("File name string for NBD must start with 'nbd:'");
  });

  it('names nodes as nbd_refresh_filename', () => {
    const inet = { type: 'inet', host: '127.0.0.1', port: '10809' } as const;
    const unix = { type: 'unix', path: '/tmp/s' } as const;
    expect(nbdExactFilename(inet, 'exp')).toBe('nbd://127.0.0.1:10809/exp');
    expect(nbdExactFilename(inet, undefined)).toBe('nbd://127.0.0.1:10809');
    expect(nbdExactFilename(unix, 'exp')).toBe('nbd+unix:///exp?socket=/tmp/s');
    expect(nbdExactFilename(unix, undefined)).toBe('nbd+unix://?socket=/tmp/s');
    expect(nbdExactFilename(unix, 'e', true)).toBe('nbds+unix:///e?socket=/tmp/s');
    expect(describeAddress(inet)).toBe('127.0.0.1:10809');
    expect(describeAddress(unix)).toBe('/tmp/s');
  });
});

describe('nbd driver options', () => {
  const config = (o: Record<string, unknown>) => nbdConfig(parseWith(nbdOptionsSchema.strict(), o));
  const refusal = (o: Record<string, unknown>) => {
    try {
      config(o);
    } catch (e) {
      return (e as Error).message;
    }
    return null;
  };

  it('derives the address and export as QEMU does', () => {
    expect(config({ filename: 'nbd+unix:///e?socket=/s', 'reconnect-delay': '5' })).toEqual({
      address: { type: 'unix', path: '/s' },
      exportName: 'e',
      reconnectDelaySeconds: 5,
      openTimeoutSeconds: 0,
    });
    expect(config({ host: 'h' }).address).toEqual({ type: 'inet', host: 'h', port: '10809' });
    expect(config({ path: '/p', export: 'x' })).toMatchObject({ address: { type: 'unix', path: '/p' }, exportName: 'x' });
    expect(config({ server: { type: 'inet', host: 'h', port: 7 } }).address).toEqual({ type: 'inet', host: 'h', port: '7' });
  });

  it.each([
    [{}, 'NBD server address missing'],
    [{ server: { path: '/x' } }, "Parameter 'type' is missing"],
    [{ server: { type: 'unix' } }, "Parameter 'path' is missing"],
    [{ server: { type: 'inet', host: 'h' } }, "Parameter 'port' is missing"],
    [{ server: { type: 'bogus' } }, "Parameter 'type' does not accept value 'bogus'"],
    [{ server: { type: 'unix', path: '/p', foo: 1 } }, "Parameter 'foo' is unexpected"],
    [{ path: '/x', port: '3' }, 'port may not be used without host'],
    [{ path: '/x', host: 'y' }, 'path and host may not be used at the same time'],
    [{ path: '/x', server: { type: 'unix' } }, "Cannot use 'server' and path/host/port at the same time"],
    [{ filename: 'nbd://h/e', export: 'y' }, "Option 'export' cannot be used with a file name"],
    [{ filename: 'nbd://' }, 'No valid URL specified'],
    [{ path: '/p', export: 'x'.repeat(4097) }, 'export name too long to send to server'],
  ])('refuses %j', (o, message) => {
    expect(refusal(o)).toBe(message);
  });
});
